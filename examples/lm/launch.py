"""Starts the processes of one run of ``python -m examples.lm`` on this machine::

    python -m examples.lm.launch --num-processes 2 --mesh data=2,fsdp=4 --steps 100

(see :mod:`examples.common.launch`, which this is with the program changed).
"""

from examples.common import launch
from examples.lm.main import check_launch

if __name__ == "__main__":
    launch.main(program="examples.lm", check=check_launch)
