"""vhostlab: a lab kit for QEMU's vhost and live migration.

The package is layered; lower layers never import higher ones:

    errors      VhostlabError, the root of every error the kit raises
    protocol/   vhost-user wire format, sans-IO
    memory      guest memory regions and address translation
    ring/, dirtylog   split virtqueues and the dirty-page log (numba kernels)
    backend/    the vhost-user-net device server
    frontend/, qemu/  QEMU's side: built-in VhostOps and a real QEMU
    viz/, exercises/  what the labs draw and grade
    cli         the `vhostlab` command
"""

from .errors import VhostlabError

__version__ = "0.1.0"
__all__ = ["VhostlabError", "__version__"]
