import sys

from ownllm.cli import main

sys.exit(main())
