-- V001: trading schema (trades and positions). Applied once by the postgresql role and recorded in
-- public.grandmodel_schema_migrations; plain CREATE statements on purpose: a second run would fail.
CREATE SCHEMA trading;

CREATE TABLE trading.trades (
    id            bigserial PRIMARY KEY,
    trade_id      uuid        NOT NULL UNIQUE,
    symbol        text        NOT NULL,
    side          text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    quantity      numeric(20, 8) NOT NULL CHECK (quantity > 0),
    price         numeric(20, 8) NOT NULL CHECK (price > 0),
    strategy      text        NOT NULL,
    agent         text        NOT NULL CHECK (agent IN ('strategic', 'tactical', 'manual')),
    model_version text,
    order_id      text,
    commission    numeric(20, 8) NOT NULL DEFAULT 0,
    pnl           numeric(20, 8),
    executed_at   timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trades_symbol_executed_at_idx ON trading.trades (symbol, executed_at DESC);
CREATE INDEX trades_strategy_executed_at_idx ON trading.trades (strategy, executed_at DESC);
CREATE INDEX trades_executed_at_idx ON trading.trades (executed_at DESC);

CREATE TABLE trading.positions (
    id             bigserial PRIMARY KEY,
    symbol         text        NOT NULL,
    strategy       text        NOT NULL,
    quantity       numeric(20, 8) NOT NULL,
    avg_price      numeric(20, 8) NOT NULL,
    market_value   numeric(20, 8),
    unrealized_pnl numeric(20, 8),
    realized_pnl   numeric(20, 8) NOT NULL DEFAULT 0,
    opened_at      timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    CONSTRAINT positions_symbol_strategy_opened_key UNIQUE (symbol, strategy, opened_at)
);
CREATE INDEX positions_open_idx ON trading.positions (symbol, strategy) WHERE closed_at IS NULL;
CREATE INDEX positions_updated_at_idx ON trading.positions (updated_at DESC);
