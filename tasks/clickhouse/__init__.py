"""ClickHouse work of the services: the analytics tables (``schema``), request counts of
deployments (``requests``) and build output (``builds``).

The SQL lives here; the connection (server or chdb directory) is ``blocks.clickhouse``. Nothing
is re-exported, so importing one module does not load the others' dependencies.
"""
