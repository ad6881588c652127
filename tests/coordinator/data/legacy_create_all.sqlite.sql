-- The SQLite schema that RoundStore's `metadata.create_all` made before migrations
-- (fedvault 0.1.0, commit e97672c). Never edit: tests/coordinator/test_migrations.py
-- builds a legacy store from it, and checks that revision 0001 makes the same schema.
CREATE TABLE jobs (
	id INTEGER NOT NULL,
	name VARCHAR(200) NOT NULL,
	config TEXT NOT NULL,
	status VARCHAR(16) NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	CONSTRAINT pk_jobs PRIMARY KEY (id),
	CONSTRAINT ck_jobs_status CHECK (status IN ('running', 'finished', 'failed', 'stopped')),
	CONSTRAINT uq_jobs_name UNIQUE (name)
);
CREATE TABLE rounds (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	number INTEGER NOT NULL,
	attempt INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	reason TEXT NOT NULL,
	started_at DATETIME NOT NULL,
	committed_at DATETIME,
	total_weight FLOAT,
	num_participants INTEGER NOT NULL,
	train_loss FLOAT,
	eval_accuracy FLOAT,
	eval_loss FLOAT,
	evaluated_at DATETIME,
	CONSTRAINT pk_rounds PRIMARY KEY (id),
	CONSTRAINT uq_rounds_job_id_number_attempt UNIQUE (job_id, number, attempt),
	CONSTRAINT ck_rounds_status CHECK (status IN ('committed', 'failed')),
	CONSTRAINT ck_rounds_number CHECK (number >= 1),
	CONSTRAINT ck_rounds_attempt CHECK (attempt >= 1),
	CONSTRAINT ck_rounds_num_participants CHECK (num_participants >= 0),
	CONSTRAINT fk_rounds_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE UNIQUE INDEX uq_rounds_committed ON rounds (job_id, number) WHERE status = 'committed';
CREATE TABLE models (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	kind VARCHAR(8) NOT NULL,
	blob BLOB NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	total_weight FLOAT NOT NULL,
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_models PRIMARY KEY (id),
	CONSTRAINT uq_models_job_id_round UNIQUE (job_id, round),
	CONSTRAINT ck_models_kind CHECK (kind IN ('ckks', 'plain')),
	CONSTRAINT fk_models_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE privacy_ledger (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	hospital VARCHAR(200) NOT NULL,
	round INTEGER NOT NULL,
	epsilon FLOAT NOT NULL,
	delta FLOAT,
	noise_multiplier FLOAT,
	sample_rate FLOAT,
	steps BIGINT,
	accountant VARCHAR(32),
	accountant_state TEXT,
	CONSTRAINT pk_privacy_ledger PRIMARY KEY (id),
	CONSTRAINT uq_privacy_ledger_job_id_hospital_round UNIQUE (job_id, hospital, round),
	CONSTRAINT ck_privacy_ledger_epsilon CHECK (epsilon >= 0),
	CONSTRAINT ck_privacy_ledger_delta CHECK (delta IS NULL OR (delta >= 0 AND delta < 1)),
	CONSTRAINT fk_privacy_ledger_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE audit_events (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
	job_id INTEGER,
	created_at DATETIME NOT NULL,
	kind VARCHAR(64) NOT NULL,
	actor VARCHAR(200) NOT NULL,
	detail TEXT NOT NULL,
	prev_hash VARCHAR(64) NOT NULL,
	hash VARCHAR(64) NOT NULL,
	CONSTRAINT fk_audit_events_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id),
	CONSTRAINT uq_audit_events_prev_hash UNIQUE (prev_hash),
	CONSTRAINT uq_audit_events_hash UNIQUE (hash)
);
CREATE INDEX ix_audit_events_job_id ON audit_events (job_id);
CREATE TABLE participations (
	id INTEGER NOT NULL,
	round_id INTEGER NOT NULL,
	hospital VARCHAR(200) NOT NULL,
	node_id BIGINT NOT NULL,
	status VARCHAR(16) NOT NULL,
	reason TEXT NOT NULL,
	samples INTEGER NOT NULL,
	train_loss FLOAT,
	epsilon FLOAT,
	delta FLOAT,
	noise_multiplier FLOAT,
	sample_rate FLOAT,
	steps BIGINT,
	accountant VARCHAR(32),
	bytes_received BIGINT NOT NULL,
	eval_accuracy FLOAT,
	eval_loss FLOAT,
	eval_samples INTEGER,
	CONSTRAINT pk_participations PRIMARY KEY (id),
	CONSTRAINT uq_participations_round_id_hospital UNIQUE (round_id, hospital),
	CONSTRAINT ck_participations_status CHECK (status IN ('ok', 'refused', 'rejected', 'failed', 'evaluated')),
	CONSTRAINT ck_participations_samples CHECK (samples >= 0),
	CONSTRAINT ck_participations_bytes_received CHECK (bytes_received >= 0),
	CONSTRAINT ck_participations_eval_samples CHECK (eval_samples IS NULL OR eval_samples >= 0),
	CONSTRAINT fk_participations_round_id_rounds FOREIGN KEY(round_id) REFERENCES rounds (id)
);
