-- T001: time-series tables (plain PostgreSQL; T002 turns them into hypertables when TimescaleDB
-- is installed). Applied once and recorded in public.grandmodel_schema_migrations.
CREATE SCHEMA timeseries;

CREATE TABLE timeseries.market_data (
    time     timestamptz NOT NULL,
    symbol   text        NOT NULL,
    open     numeric(20, 8),
    high     numeric(20, 8),
    low      numeric(20, 8),
    close    numeric(20, 8),
    volume   numeric(28, 8),
    bid      numeric(20, 8),
    ask      numeric(20, 8),
    source   text        NOT NULL DEFAULT 'feed',
    PRIMARY KEY (symbol, time)
);
CREATE INDEX market_data_time_idx ON timeseries.market_data (time DESC);

CREATE TABLE timeseries.system_metrics (
    time    timestamptz      NOT NULL,
    host    text             NOT NULL,
    metric  text             NOT NULL,
    value   double precision NOT NULL,
    labels  jsonb            NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX system_metrics_host_metric_time_idx ON timeseries.system_metrics (host, metric, time DESC);
CREATE INDEX system_metrics_time_idx ON timeseries.system_metrics (time DESC);
