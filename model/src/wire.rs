//! The Kafka wire format between the API (which writes records) and the pipeline (which reads them):
//! one place for the key, the header and the void record, so neither side spells them on its own.
//!
//! ```text
//!  key: customer_id        (a customer's events and voids share a partition, in order)
//!  header meterflow-kind:  event  an event the API stored and answered 201 for
//!                          void   a void written by POST /api/v1/events/{id}/void, payload VoidRecord
//!                          (none) an event produced straight to Kafka by an application
//!  header content-type:    application/cloudevents+json marks a CloudEvent
//! ```

use serde::{Deserialize, Serialize};

/// The header the API sets on the records it writes.
pub const KIND_HEADER: &str = "meterflow-kind";

/// [`KIND_HEADER`]'s values, which are also the `kind` column of the API's outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKindHeader {
    /// An event the API stored (its id is claimed already).
    Event,
    /// A void of a stored event.
    Void,
}

impl RecordKindHeader {
    /// The header's value, as written.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKindHeader::Event => "event",
            RecordKindHeader::Void => "void",
        }
    }

    /// The kind a header value names; `None` for any other spelling (such a record is read as an
    /// application's event).
    pub fn parse(value: &[u8]) -> Option<Self> {
        match value {
            b"event" => Some(RecordKindHeader::Event),
            b"void" => Some(RecordKindHeader::Void),
            _ => None,
        }
    }
}

/// The payload of a void record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidRecord {
    pub event_id: String,
    pub customer_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_as_written() {
        for kind in [RecordKindHeader::Event, RecordKindHeader::Void] {
            assert_eq!(
                RecordKindHeader::parse(kind.as_str().as_bytes()),
                Some(kind)
            );
        }
        assert_eq!(RecordKindHeader::parse(b"VOID"), None);
    }

    #[test]
    fn a_void_record_has_exactly_its_two_fields() {
        let v = VoidRecord {
            event_id: "e".into(),
            customer_id: "c".into(),
        };
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(text, r#"{"event_id":"e","customer_id":"c"}"#);
        assert!(
            serde_json::from_str::<VoidRecord>(r#"{"event_id":"e","customer_id":"c","x":1}"#)
                .is_err()
        );
    }
}
