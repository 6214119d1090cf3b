"""What a message's handler and the mods around it share, worked out once per message.

The audit log, the egress guard and the handler all need the site and the instruction of
the message they wrap; each is built on first use and kept while the message lives.
"""

from __future__ import annotations

import weakref

from flwr.app import Context, Message

from ark_core.fed.protocol import CONFIG, Instruction
from client.site import Site

_sites: weakref.WeakKeyDictionary[Message, Site] = weakref.WeakKeyDictionary()
_instructions: weakref.WeakKeyDictionary[Message, Instruction] = weakref.WeakKeyDictionary()


def site_of(msg: Message, context: Context) -> Site:
    """The site that handles ``msg`` (its YAML, or its part of a simulation)."""
    site = _sites.get(msg)
    if site is None:
        site = _sites[msg] = Site.from_flower_config(context.node_config, context.run_config)
    return site


def instruction_of(msg: Message) -> Instruction:
    """The instruction ``msg`` carries; raises InstructionError naming what is wrong."""
    ins = _instructions.get(msg)
    if ins is None:
        ins = _instructions[msg] = Instruction.from_config(
            dict(msg.content.config_records.get(CONFIG, {})))
    return ins
