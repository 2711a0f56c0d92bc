"""The ``streamline`` subcommands, one module each: ``add_parser(sub)`` adds its parser, ``run(args)`` runs
it and returns the exit status."""
