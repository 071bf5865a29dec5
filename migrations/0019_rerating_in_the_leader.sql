-- Re-rating jobs run in the pipeline's leader (sinks/src/rerating_jobs.rs), which hands each job's
-- correction to its running rating at one epoch: the pipeline no longer restarts to reload the
-- corrected state, so the resync request and its acknowledgement (migration 0005) are no longer read or
-- written. They stay for one release, so a pipeline or API of the release before keeps working while
-- processes are replaced one by one after `meterflow migrate`; a later migration drops them.
COMMENT ON COLUMN pipeline_leases.resync_requested IS 'unused since migration 0019; dropped in a later release';
COMMENT ON COLUMN pipeline_leases.resync_done IS 'unused since migration 0019; dropped in a later release';

-- A queued job wakes the leader's runner at once: the payload is the table's name, on the channel the
-- pipeline already LISTENs on for meters and price books (migration 0018).
CREATE TRIGGER rerating_jobs_notify_config
    AFTER INSERT ON rerating_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION meterflow_notify_config();
