-- V003: monitoring schema (health samples of the platform's components).
CREATE SCHEMA monitoring;

CREATE TABLE monitoring.system_health (
    id          bigserial PRIMARY KEY,
    component   text        NOT NULL,
    host        text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('healthy', 'degraded', 'unhealthy', 'unknown')),
    latency_ms  double precision,
    cpu_percent double precision,
    memory_mb   double precision,
    details     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    checked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX system_health_component_checked_at_idx
    ON monitoring.system_health (component, checked_at DESC);
CREATE INDEX system_health_unhealthy_idx
    ON monitoring.system_health (checked_at DESC) WHERE status <> 'healthy';
