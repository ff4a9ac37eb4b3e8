-- The database of the first release (migrations m001-m003), empty: the upgrade test starts here.

CREATE TABLE "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
INSERT INTO "_sqlite_migrations" VALUES(1,'appliance','m001_initial','2026-11-23 14:32:52.846051+00:00');
INSERT INTO "_sqlite_migrations" VALUES(2,'appliance','m002_operating_points','2026-11-23 14:32:52.849922+00:00');
INSERT INTO "_sqlite_migrations" VALUES(3,'appliance','m003_outbox','2026-11-23 14:32:52.851480+00:00');
CREATE TABLE "analyses" (
   "id" INTEGER PRIMARY KEY,
   "series_instance_uid" TEXT REFERENCES "series"("series_instance_uid"),
   "study_instance_uid" TEXT,
   "status" TEXT,
   "reason_code" TEXT,
   "reason" TEXT,
   "problems" TEXT,
   "slices" INTEGER,
   "shape_zyx" TEXT,
   "spacing_mm_zyx" TEXT,
   "seconds" TEXT,
   "created_at" TEXT,
   "superseded" INTEGER
);
CREATE TABLE "audit_log" (
   "id" INTEGER PRIMARY KEY,
   "at" TEXT,
   "actor" TEXT,
   "action" TEXT,
   "object" TEXT,
   "detail" TEXT
);
CREATE TABLE "instances" (
   "sop_instance_uid" TEXT PRIMARY KEY,
   "series_instance_uid" TEXT REFERENCES "series"("series_instance_uid"),
   "study_instance_uid" TEXT,
   "sop_class_uid" TEXT,
   "transfer_syntax_uid" TEXT,
   "instance_number" INTEGER,
   "path" TEXT,
   "size_bytes" INTEGER,
   "sha256" TEXT,
   "source" TEXT,
   "received_at" TEXT
);
CREATE TABLE "jobs" (
   "id" INTEGER PRIMARY KEY,
   "kind" TEXT,
   "study_instance_uid" TEXT,
   "series_instance_uid" TEXT,
   "state" TEXT,
   "priority" INTEGER,
   "attempts" INTEGER,
   "not_before" TEXT,
   "lease_until" TEXT,
   "progress" REAL,
   "error" TEXT,
   "created_at" TEXT,
   "updated_at" TEXT
);
CREATE TABLE "operating_points" (
   "id" INTEGER PRIMARY KEY,
   "model" TEXT,
   "model_version" TEXT,
   "threshold" REAL,
   "target_sensitivity" REAL,
   "evaluation" TEXT,
   "recorded_by" TEXT,
   "recorded_at" TEXT
);
CREATE TABLE "outbox" (
   "id" INTEGER PRIMARY KEY,
   "destination" TEXT,
   "path" TEXT,
   "sop_instance_uid" TEXT,
   "series_instance_uid" TEXT,
   "state" TEXT,
   "attempts" INTEGER,
   "not_before" TEXT,
   "error" TEXT,
   "created_at" TEXT,
   "sent_at" TEXT
);
CREATE TABLE "patients" (
   "patient_key" TEXT PRIMARY KEY,
   "patient_id" TEXT,
   "patient_name" TEXT,
   "patient_birth_date" TEXT,
   "patient_sex" TEXT
);
CREATE TABLE "quarantine" (
   "id" INTEGER PRIMARY KEY,
   "source" TEXT,
   "original_name" TEXT,
   "path" TEXT,
   "size_bytes" INTEGER,
   "sha256" TEXT,
   "reason_code" TEXT,
   "reason" TEXT,
   "created_at" TEXT
);
CREATE TABLE "results" (
   "id" INTEGER PRIMARY KEY,
   "analysis_id" INTEGER REFERENCES "analyses"("id"),
   "series_instance_uid" TEXT,
   "model" TEXT,
   "model_version" TEXT,
   "validated" INTEGER,
   "backend" TEXT,
   "precision" TEXT,
   "score" REAL,
   "threshold" REAL,
   "flagged" INTEGER,
   "findings" TEXT,
   "seconds" REAL,
   "created_at" TEXT
);
CREATE TABLE "series" (
   "series_instance_uid" TEXT PRIMARY KEY,
   "study_instance_uid" TEXT REFERENCES "studies"("study_instance_uid"),
   "modality" TEXT,
   "series_number" INTEGER,
   "series_description" TEXT,
   "instance_count" INTEGER,
   "status" TEXT,
   "reason_code" TEXT,
   "reason" TEXT,
   "last_received_at" TEXT,
   "updated_at" TEXT
);
CREATE TABLE "studies" (
   "study_instance_uid" TEXT PRIMARY KEY,
   "patient_key" TEXT REFERENCES "patients"("patient_key"),
   "study_date" TEXT,
   "study_time" TEXT,
   "study_description" TEXT,
   "accession_number" TEXT,
   "created_at" TEXT,
   "updated_at" TEXT
);
CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
CREATE INDEX "idx_instances_series_instance_uid"
    ON "instances" ("series_instance_uid");
CREATE INDEX "idx_series_study_instance_uid"
    ON "series" ("study_instance_uid");
CREATE INDEX "idx_analyses_series_instance_uid"
    ON "analyses" ("series_instance_uid");
CREATE INDEX "idx_results_analysis_id"
    ON "results" ("analysis_id");
CREATE INDEX "idx_jobs_state_priority"
    ON "jobs" ("state", "priority");
CREATE INDEX "idx_studies_study_date"
    ON "studies" ("study_date");
CREATE INDEX "idx_operating_points_model_model_version"
    ON "operating_points" ("model", "model_version");
CREATE INDEX "idx_outbox_state_not_before"
    ON "outbox" ("state", "not_before");
CREATE UNIQUE INDEX "idx_outbox_destination_sop_instance_uid"
    ON "outbox" ("destination", "sop_instance_uid");

