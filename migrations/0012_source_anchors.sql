-- Topic identity without Kafka topic IDs (review findings 8 and 9). At each start the pipeline leader
-- remembers, per partition, one record it has read (its offset and a hash of its key and payload); at the
-- next start it reads that record again. Another record at that offset, or none where one must be, means
-- the topic was deleted and recreated (or truncated): the stored offsets no longer describe it, and the
-- pipeline refuses to start until an operator resets the source (`meterflow pipeline --reset-source`).
CREATE TABLE source_anchors (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    "offset"    bigint  NOT NULL,
    record_hash bigint  NOT NULL,
    CONSTRAINT source_anchors_pkey PRIMARY KEY (topic, partition)
);
