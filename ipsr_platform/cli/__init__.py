"""The CLI layer, above ``jobs`` and ``serving``: the ``ipsr`` command (``main``) and the commands only it runs
(``quickstart``, ``submit``, ``smoke``). Each job's own command is generated from its config model by
``ipsr_platform.commands``, which the jobs use too and so stays a layer below."""
