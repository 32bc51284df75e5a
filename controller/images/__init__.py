"""The project's own container images, built without a registry from the installed package.

`controller.images.build` assembles one root filesystem (this interpreter, its standard library, the shared
libraries it needs, the site-packages of exactly the distributions `fleet-controller` requires, and the
controller's source with the template folders its renderers read) and imports it with the container engine
under the tags the spec's ``images`` name (``localhost/fleet-gatekeeper:<version>``,
``localhost/fleet-agent:<version>``). Ship them to a host with ``save_image`` / ``load_image``
(``podman save`` / ``podman load``).
"""

from __future__ import annotations

from controller.images.build import (
    LABEL_CONTENT,
    LABEL_IMAGE,
    LABEL_VERSION,
    PROGRAM_IMAGES,
    SKIPPED_DISTRIBUTIONS,
    VERSION,
    BuildResult,
    BuiltImage,
    RootFs,
    build_images,
    default_tags,
    engine_command,
    image_info,
    load_image,
    program_rootfs,
    save_image,
)

__all__ = [
    "LABEL_CONTENT",
    "LABEL_IMAGE",
    "LABEL_VERSION",
    "PROGRAM_IMAGES",
    "SKIPPED_DISTRIBUTIONS",
    "VERSION",
    "BuildResult",
    "BuiltImage",
    "RootFs",
    "build_images",
    "default_tags",
    "engine_command",
    "image_info",
    "load_image",
    "program_rootfs",
    "save_image",
]
