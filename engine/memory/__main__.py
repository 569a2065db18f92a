import sys

from engine.memory.cli import main

sys.exit(main())
