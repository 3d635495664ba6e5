"""MegaContext: learned context compression and focus on top of nanochat.

nanochat never imports this package; it plugs in through nanochat/hooks.py
(see ../shared/DESIGN.md section 3).
"""
