"""The leaderboard stage: result records aggregated into a board (aggregate), written as Markdown,
CSV and HTML (render) with bar charts (plots), and the `sslbench results` listing (listing).

It reads only the core's result records and task registry, never another stage."""
