"""What a run of a gateway instance leaves behind when it dies without its teardown, removed.

Both the next ``duprep serve`` (holding the instance's locks, so that no
process of the dead run can still be using them) and ``duprep cleanup`` call
:func:`remove`: the two queues, and the table whatever state a crash left it
in (a whole one, one of another layout, or one cut short while it was
being created).  The lock file is the caller's: it is what proves nobody is
attached.
"""

from __future__ import annotations

from . import ipcnames, queues
from .errors import DuprepError
from .table import Table

__all__ = ["remove"]


def remove(instance: str) -> list[str]:
    """Remove the queues and table of ``instance``; the names of those that were there."""
    names = ipcnames.all_names(instance)
    removed = [names[key] for key in ("requests", "replies") if queues.unlink(names[key])]
    try:
        table = Table.attach(names["table"])
    except FileNotFoundError:
        pass
    except DuprepError:                # another layout, or cut short by a crash while it was created
        if Table.unlink_name(names["table"]):
            removed.append(names["table"])
    else:
        table.close()
        table.unlink()
        removed.append(names["table"])
    return removed
