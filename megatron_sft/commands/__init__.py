"""One module per ``megatron-sft`` sub-command; each exposes ``add_parser(subparsers)`` and ``run(args)``."""
