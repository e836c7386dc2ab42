"""``python -m tpllama``: the same as the ``tpllama`` command."""

from .cli import run

run()
