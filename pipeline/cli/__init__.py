"""The user commands: each module's ``main(argv=None) -> int`` is a console script of the installed package
(pyproject.toml ``[project.scripts]``: ``timesformer-launch``, ``timesformer-ingest``, ``timesformer-evaluate``,
``timesformer-export``, ``timesformer-compare``, ``timesformer-demo``), and ``jobs/<name>.py`` runs the same
function from a checkout (``python jobs/launch.py --nodes 4 --recipe k400_long``). Benchmarks and studies are
not commands: they live in benchmarks/.
"""
