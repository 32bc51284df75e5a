"""The gateway host's own daemon: the gatekeeper (who is calling, may they, how much is left), with its key
store, access rules, limits, single sign-on, certificate publisher and usage ledger. Run as ``fleet-gatekeeper``."""
