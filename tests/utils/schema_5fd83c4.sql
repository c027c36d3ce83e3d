-- The PostgreSQL schema of release 5fd83c4 (before migrations), as its Base.metadata.create_all made it:
-- CreateTable/CreateIndex of `git show 5fd83c4:service/db.py` compiled for PostgreSQL.
CREATE TABLE api_keys (
    id VARCHAR(32) NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    key_hash VARCHAR(64) NOT NULL,
    prefix VARCHAR(16) NOT NULL,
    admin BOOLEAN NOT NULL,
    revoked BOOLEAN NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (key_hash)
);
CREATE INDEX ix_api_keys_tenant ON api_keys (tenant);
CREATE TABLE datasets (
    id VARCHAR(32) NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    name VARCHAR(255) NOT NULL,
    classes JSON NOT NULL,
    counts JSON NOT NULL,
    num_images INTEGER NOT NULL,
    skipped JSON NOT NULL,
    path TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_datasets_tenant ON datasets (tenant);
CREATE TABLE idempotency_keys (
    id SERIAL NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    endpoint VARCHAR(64) NOT NULL,
    key VARCHAR(255) NOT NULL,
    fingerprint VARCHAR(64) NOT NULL,
    resource_id VARCHAR(32) NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (tenant, endpoint, key)
);
CREATE TABLE jobs (
    id VARCHAR(32) NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    dataset_id VARCHAR(32) NOT NULL,
    spec JSON NOT NULL,
    status VARCHAR(16) NOT NULL,
    progress JSON NOT NULL,
    history JSON NOT NULL,
    metrics JSON,
    error TEXT,
    cancel_requested BOOLEAN NOT NULL,
    model_id VARCHAR(32),
    attempts INTEGER NOT NULL,
    worker VARCHAR(255),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    heartbeat_at TIMESTAMP WITH TIME ZONE,
    enqueued_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (id)
);
CREATE INDEX ix_jobs_dataset_id ON jobs (dataset_id);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE INDEX ix_jobs_tenant ON jobs (tenant);
CREATE TABLE models (
    id VARCHAR(32) NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    job_id VARCHAR(32) NOT NULL,
    dataset_id VARCHAR(32) NOT NULL,
    classes JSON NOT NULL,
    manifest JSON NOT NULL,
    metrics JSON NOT NULL,
    path TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_models_dataset_id ON models (dataset_id);
CREATE UNIQUE INDEX ix_models_job_id ON models (job_id);
CREATE INDEX ix_models_tenant ON models (tenant);
