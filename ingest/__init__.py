"""The ingester: garment telemetry from MQTT into InfluxDB, acknowledged only once stored.

Stages, one module each: ``consume`` (MQTT) -> ``decode`` (wire models) ->
``encode`` (line protocol) -> ``batch`` -> ``write`` (InfluxDB), wired in
``app``; settings in ``settings``, metrics in ``metrics``.
"""
