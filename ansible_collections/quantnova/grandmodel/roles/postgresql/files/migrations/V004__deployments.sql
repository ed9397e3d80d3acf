-- V004: release records (who, what, when, gate evidence, outcome) for the blue-green flow.
CREATE TABLE monitoring.deployments (
    id            bigserial PRIMARY KEY,
    release_id    uuid        NOT NULL UNIQUE,
    service       text        NOT NULL,
    version       text        NOT NULL,
    previous_version text,
    colour        text        CHECK (colour IN ('blue', 'green')),
    environment   text        NOT NULL,
    initiated_by  text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    outcome       text        NOT NULL DEFAULT 'in_progress'
                  CHECK (outcome IN ('in_progress', 'promoted', 'aborted', 'rolled_back', 'failed')),
    gate_evidence jsonb       NOT NULL DEFAULT '{}'::jsonb,
    notes         text
);
CREATE INDEX deployments_service_started_at_idx ON monitoring.deployments (service, started_at DESC);
CREATE INDEX deployments_outcome_idx ON monitoring.deployments (outcome) WHERE outcome <> 'promoted';
