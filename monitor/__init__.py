"""Monitoring: camera streams through one served (or local) `Engine`, a flip detector per stream, alarms out.

`monitor.streams` (sources, reconnect with back-off, bounded frame buffers), `monitor.cameras` (synthetic and
campaign-trial cameras with known patch onsets), `monitor.flips` (the flip detector), `monitor.pipeline` (the
loop batching streams into the engine, and the event sinks), `monitor.web` (the live page and its metrics).
Nothing here imports Ray or `serving`: the monitor holds an `Engine`, and the edge runner reads frames through
`monitor.streams` too. Evidence for an alarm (e.g. VGatt on the twin) comes in as a callable from the CLI.
"""
