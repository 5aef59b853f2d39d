"""`python -m resnet_fast ...` (and `torchrun ... -m resnet_fast train ...`): the `resnet-fast` command."""

import sys

from .tools.cli import main

# Guarded: a spawn/forkserver child process (a DataLoader worker, torch.multiprocessing) imports this
# module again as __mp_main__ and must not run the command a second time.
if __name__ == "__main__":
    sys.exit(main())
