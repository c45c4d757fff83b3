CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    args_json TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    token INTEGER NOT NULL,
    owner TEXT,
    key TEXT,
    created_at REAL NOT NULL,
    run_at REAL,
    started_at REAL,
    finished_at REAL,
    lease_until REAL,
    progress_done REAL,
    progress_total REAL,
    progress_message TEXT,
    result_json TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    timeout REAL,
    seq INTEGER NOT NULL,
    due REAL GENERATED ALWAYS AS (CASE status
        WHEN 'pending' THEN coalesce(run_at, created_at)
        WHEN 'running' THEN lease_until END) VIRTUAL
);
CREATE INDEX jobs_claim ON jobs (queue, due, seq) WHERE status IN ('pending', 'running');
CREATE INDEX jobs_unscheduled ON jobs (queue, created_at, seq)
    WHERE status = 'pending' AND run_at IS NULL;
CREATE UNIQUE INDEX jobs_active_key ON jobs (key)
    WHERE key IS NOT NULL AND status IN ('pending', 'running');
CREATE INDEX jobs_newest ON jobs (created_at);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE status IN ('cancelled', 'failed', 'succeeded', 'timed_out');
CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('seq', 0), ('beat', 0);
CREATE TABLE leases (
    name TEXT PRIMARY KEY NOT NULL,
    owner TEXT,
    epoch INTEGER NOT NULL,
    expires_at REAL,
    slot_floor INTEGER
);
CREATE TABLE slots (
    name TEXT NOT NULL,
    slot INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (name, slot)
) WITHOUT ROWID;
CREATE TABLE anchors (name TEXT PRIMARY KEY NOT NULL, at REAL NOT NULL);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    running INTEGER NOT NULL,
    lag REAL,
    beat INTEGER NOT NULL
);
