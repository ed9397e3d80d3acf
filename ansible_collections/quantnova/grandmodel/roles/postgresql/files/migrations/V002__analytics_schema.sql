-- V002: analytics schema (strategy and model performance metrics).
CREATE SCHEMA analytics;

CREATE TABLE analytics.performance_metrics (
    id            bigserial PRIMARY KEY,
    strategy      text        NOT NULL,
    agent         text        NOT NULL,
    model_version text,
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    total_return  numeric(12, 6),
    sharpe_ratio  numeric(12, 6),
    sortino_ratio numeric(12, 6),
    max_drawdown  numeric(12, 6),
    win_rate      numeric(7, 4) CHECK (win_rate BETWEEN 0 AND 1),
    trade_count   integer     NOT NULL DEFAULT 0,
    var_95        numeric(20, 8),
    computed_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT performance_metrics_period_check CHECK (period_end > period_start),
    CONSTRAINT performance_metrics_unique_period UNIQUE (strategy, agent, period_start, period_end)
);
CREATE INDEX performance_metrics_strategy_period_idx
    ON analytics.performance_metrics (strategy, period_end DESC);
