INSERT INTO monitoring.deployments
    (release_id, service, version, previous_version, colour, environment, initiated_by,
     started_at, finished_at, outcome, gate_evidence, notes)
SELECT md5(concat_ws('/', r ->> 'id', r ->> 'host', r ->> 'kind', r ->> 'finished'))::uuid,
       'grandmodel',
       coalesce(r ->> 'to_version', ''),
       nullif(r ->> 'from_version', ''),
       CASE WHEN r ->> 'to_color' IN ('blue', 'green') THEN r ->> 'to_color' END,
       %(environment)s,
       coalesce(nullif(r ->> 'who', ''), 'unknown'),
       (r ->> 'started')::timestamptz,
       (r ->> 'finished')::timestamptz,
       CASE WHEN r ->> 'outcome' = 'success' THEN 'promoted'
            WHEN r ->> 'outcome' = 'awaiting_approval' THEN 'in_progress'
            WHEN r ->> 'outcome' LIKE 'aborted%%' THEN 'aborted'
            WHEN r ->> 'outcome' LIKE 'rolled_back%%' THEN 'rolled_back'
            ELSE 'failed' END,
       r,
       concat_ws(' ', r ->> 'kind', r ->> 'outcome', 'on', r ->> 'host')
FROM jsonb_array_elements(%(records)s::jsonb) AS r
WHERE r ? 'id' AND r ? 'started' AND r ? 'finished'
ON CONFLICT (release_id) DO NOTHING
