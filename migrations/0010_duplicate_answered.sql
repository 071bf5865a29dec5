-- Finding 6 (issue 13): a copy of an event whose first copy is still on its way to Kafka is answered 409
-- DUPLICATE_EVENT only after this flag is set on the id. If Kafka then refuses the first copy, its
-- withdrawal keeps the event (the outbox relay delivers it), so "already accepted" is never a lie.
-- The flag and the withdrawal's DELETE lock the same row: whichever commits first decides.
ALTER TABLE event_ids ADD COLUMN duplicate_answered boolean NOT NULL DEFAULT false;
