"""Imported by the verifier's forkserver (a preload module, see pool.py): warms the parser once there,
so that every worker it forks, replacements after a timeout included, starts warm."""
from common.verifier.symbolic import warm_up

warm_up()
