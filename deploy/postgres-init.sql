-- deploy/postgres-init.sql — run once by the postgres:15 image (deploy/compose.yaml) on a fresh volume:
-- the same role and database that deploy/local/up creates.
CREATE ROLE meterflow LOGIN CREATEDB;
CREATE DATABASE meterflow OWNER meterflow;
