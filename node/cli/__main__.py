"""``python -m node.cli ARGS`` runs the ``synthnode`` command (same as the console script)."""
from node.cli import app

app(prog_name="synthnode")
