-- A forkview database as schema version 1 wrote it (before traces.stop_reason,
-- traces.tokens_per_second, traces.host and traces.pid), with a little data.
-- tests/test_store.py builds a file from this and checks Store.open upgrades it.
CREATE TABLE meta (
	"key" VARCHAR NOT NULL,
	value VARCHAR NOT NULL,
	PRIMARY KEY ("key")
);
CREATE TABLE models (
	id INTEGER NOT NULL,
	name VARCHAR NOT NULL,
	spec VARCHAR NOT NULL,
	kind VARCHAR NOT NULL,
	content_hash VARCHAR,
	revision VARCHAR,
	dtype VARCHAR NOT NULL,
	device VARCHAR NOT NULL,
	created_at VARCHAR NOT NULL,
	PRIMARY KEY (id)
);
CREATE TABLE prompts (
	id INTEGER NOT NULL,
	text VARCHAR NOT NULL,
	reference_answer VARCHAR,
	source_set VARCHAR,
	source_id VARCHAR,
	created_at VARCHAR NOT NULL,
	PRIMARY KEY (id)
);
CREATE TABLE traces (
	id INTEGER NOT NULL,
	uid VARCHAR NOT NULL,
	model_id INTEGER NOT NULL,
	prompt_id INTEGER NOT NULL,
	parent_trace_id INTEGER,
	fork_position INTEGER,
	forced_token_ids VARCHAR,
	prompt_token_ids VARCHAR NOT NULL,
	raw BOOLEAN NOT NULL,
	max_new_tokens INTEGER NOT NULL,
	temperature FLOAT NOT NULL,
	top_p FLOAT NOT NULL,
	top_k INTEGER NOT NULL,
	seed INTEGER,
	stop VARCHAR NOT NULL,
	top_alternatives INTEGER NOT NULL,
	status VARCHAR NOT NULL,
	error VARCHAR,
	started_at VARCHAR NOT NULL,
	finished_at VARCHAR,
	text VARCHAR NOT NULL,
	n_tokens INTEGER NOT NULL,
	forkview_version VARCHAR NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (uid),
	FOREIGN KEY(model_id) REFERENCES models (id),
	FOREIGN KEY(prompt_id) REFERENCES prompts (id),
	FOREIGN KEY(parent_trace_id) REFERENCES traces (id)
);
CREATE INDEX ix_traces_model ON traces (model_id);
CREATE INDEX ix_traces_parent ON traces (parent_trace_id);
CREATE INDEX ix_traces_started ON traces (started_at);
CREATE TABLE tokens (
	trace_id INTEGER NOT NULL,
	position INTEGER NOT NULL,
	token_id INTEGER NOT NULL,
	text VARCHAR NOT NULL,
	logprob FLOAT NOT NULL,
	rank INTEGER NOT NULL,
	entropy FLOAT NOT NULL,
	sampling_entropy FLOAT NOT NULL,
	top TEXT NOT NULL,
	PRIMARY KEY (trace_id, position),
	FOREIGN KEY(trace_id) REFERENCES traces (id) ON DELETE CASCADE
);

INSERT INTO meta ("key", value) VALUES ('created_by', 'forkview 0.0.9');
INSERT INTO models (id, name, spec, kind, content_hash, revision, dtype, device, created_at)
VALUES (1, 'SmolLM2-135M-Instruct (Q4_1, embedded)', 'default', 'default',
        'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53', NULL,
        'float32', 'cpu', '2024-11-01T10:00:00.000+00:00');
INSERT INTO prompts (id, text, reference_answer, source_set, source_id, created_at)
VALUES (1, 'Tom has 3 apples and buys 5 more. How many apples?', '8', 'arith', '0007',
        '2024-11-01T10:00:01.000+00:00');
INSERT INTO traces (id, uid, model_id, prompt_id, parent_trace_id, fork_position,
                    forced_token_ids, prompt_token_ids, raw, max_new_tokens, temperature,
                    top_p, top_k, seed, stop, top_alternatives, status, error, started_at,
                    finished_at, text, n_tokens, forkview_version)
VALUES (1, 'a3f1c0de5b7e4c1d9e2f6a8b0c4d2e1f', 1, 1, NULL, NULL, NULL, '[1, 2, 3]', 0, 64,
        0.0, 1.0, 0, NULL, '[]', 2, 'complete', NULL, '2024-11-01T10:00:02.000+00:00',
        '2024-11-01T10:00:03.000+00:00', 'He has', 2, '0.0.9');
INSERT INTO tokens (trace_id, position, token_id, text, logprob, rank, entropy,
                    sampling_entropy, top)
VALUES (1, 0, 1206, 'He', -0.25, 1, 1.5, 0.0,
        '[{"token_id": 1206, "text": "He", "prob": 0.78}, {"token_id": 504, "text": "Tom", "prob": 0.1}]'),
       (1, 1, 553, ' has', -0.125, 1, 0.75, 0.0,
        '[{"token_id": 553, "text": " has", "prob": 0.88}, {"token_id": 10, "text": " é", "prob": 0.05}]');
PRAGMA user_version = 1;
