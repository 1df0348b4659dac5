"""Inference-time guidance: each method a plan for the attention entry point plus a rule that
combines the model's predictions (CFG, CFG-Zero*, PAG, SoftPAG/HeadHunter, SEG, StyleAligned,
Attend-and-Excite)."""
