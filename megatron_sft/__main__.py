import sys

from megatron_sft.cli import main

sys.exit(main())
