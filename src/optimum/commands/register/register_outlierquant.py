"""Registers ``optimum-cli outlierquant ...`` with optimum's command line.

optimum-cli imports every ``optimum/commands/register/register_*.py`` it finds on the
``optimum.commands.register`` namespace path (PEP 420: no ``__init__.py`` anywhere on
this path) and adds the commands in ``REGISTER_COMMANDS``. This import stays light: the
command module pulls in argparse only; models and runtimes load inside ``run()``.
"""

from outlierquant.plugin.optimum_command import OutlierQuantCommand

REGISTER_COMMANDS = [OutlierQuantCommand]
