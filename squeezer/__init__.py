"""Squeezer's application layer, on top of the core (`compiler`), the passes and codegen: the
`squeezer` command line, the demo, the hardware-aware search, recipes (Deep Compression), the demo
data and the model zoo. Nothing below imports it."""
