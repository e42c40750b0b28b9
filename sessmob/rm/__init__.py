"""The Relocation Manager: one per device, moving service sessions to and from other devices.

Modules: `wire` (R frames), `transport` (the R transport seam), `peer` (interface R between
RMs), `control` (interface U for the controller); the daemon itself lives alongside. Nothing
is imported here, so that `sessmob` subcommands load only what they use.
"""
