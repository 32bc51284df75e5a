from controller.swap.service import main

main()
