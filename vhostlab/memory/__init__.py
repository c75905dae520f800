"""Guest memory: the regions of a vhost-user memory table, mapped into this process.

Theory of operation
-------------------
QEMU tells a back-end where guest RAM lives with SET_MEM_TABLE (or one region
at a time with ADD_MEM_REG / REM_MEM_REG): each region comes with a file
descriptor and the four numbers of ``struct vhost_user_memory_region``
(guest_phys_addr, memory_size, userspace_addr, mmap_offset). The back-end
maps each fd with MAP_SHARED, so it sees the very pages the guest sees, and
from then on turns each address the guest hands it (a GPA in a descriptor)
into a place in its own memory, after checking that the whole range lies
inside one region.

The package, one job per module:

``regions``        a region's numbers (:class:`GuestMemoryRegion`), the checks
                   it must pass before it is mapped, and the errors
``address_space``  one PROT_NONE reservation, a slot per region with guard
                   pages around it, one numpy array spanning it all, and
                   mappings that outlive no numpy view
``translation``    the int64 region table and the numba kernel
                   :func:`gpa_to_host` (and its twin :func:`gpa_to_host_py`)
                   that the ring kernels translate every descriptor with
``ram``            guest RAM as a front-end creates it: memfds laid out like
                   QEMU's ``pc`` machine
``guest_memory``   :class:`GuestMemory`, which puts them together

File descriptors: :meth:`GuestMemory.add_region` maps the fd it is given and
does not keep it; the caller still owns it and may close it as soon as the
call returns (the mapping holds its own reference to the file). Memory made
by :meth:`GuestMemory.allocate` / :meth:`GuestMemory.allocate_region` owns
its memfds (the front-end sends them with SET_MEM_TABLE or ADD_MEM_REG) and
closes them in :meth:`GuestMemory.close`.

Lifetime: numpy views returned by :meth:`GuestMemory.view` keep guest memory
mapped. :meth:`GuestMemory.close` and :meth:`GuestMemory.remove_region` unmap
at once when no view is alive; otherwise the pages stay mapped (and out of
the table) until the last view is dropped, so no view can ever dangle.

Errors are :class:`GuestMemoryError` subclasses whose messages name the
field, the value and the limit.
"""
from __future__ import annotations

from .address_space import AddressSpace, MappedArea, views_alive
from .guest_memory import DEFAULT_RESERVE, GuestMemory
from .ram import DEFAULT_RAM_SIZE, new_memfd, ram_layout
from .regions import (MAX_GUEST_ADDR, PAGE_SIZE, TARGET_PAGE_SIZE, GuestMemoryError,
                      GuestMemoryRegion, InvalidRegionError, RegionFileError,
                      RegionLimitError, RegionNotFoundError, RegionOverlapError,
                      UnmappedAddressError)
from .translation import (REGION_GPA, REGION_HOST, REGION_SIZE, REGION_UADDR,
                          gpa_to_host, gpa_to_host_py)

__all__ = [
    "PAGE_SIZE", "TARGET_PAGE_SIZE", "MAX_GUEST_ADDR", "DEFAULT_RESERVE",
    "DEFAULT_RAM_SIZE", "REGION_GPA", "REGION_SIZE", "REGION_HOST", "REGION_UADDR",
    "GuestMemoryRegion", "GuestMemory", "gpa_to_host", "gpa_to_host_py",
    "ram_layout", "new_memfd", "AddressSpace", "MappedArea", "views_alive",
    "GuestMemoryError", "UnmappedAddressError", "InvalidRegionError",
    "RegionOverlapError", "RegionLimitError", "RegionFileError",
    "RegionNotFoundError",
]

# The public classes say they come from the package, where they are imported
# from (an error a learner's code raised reads "memory.UnmappedAddressError").
for _cls in (GuestMemory, GuestMemoryRegion, AddressSpace, MappedArea, GuestMemoryError,
             UnmappedAddressError, InvalidRegionError, RegionOverlapError,
             RegionLimitError, RegionFileError, RegionNotFoundError):
    _cls.__module__ = __name__
del _cls
