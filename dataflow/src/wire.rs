//! What crosses processes as JSON text. Timely encodes the data a cluster exchanges between processes
//! with bincode, which writes a struct's fields in order and reads them back in the same order, with
//! no names. A field skipped when serializing (`skip_serializing_if`, which the model's API types use
//! to keep their JSON lean: a count meter's `value_property`, a book's empty selector) makes the
//! reader take the next field's bytes for it, and the receiving worker panics.
//!
//! ```text
//!  Meter, PriceBook ──serde_json──► text ──bincode──► other process ──bincode──► text ──serde_json──► Meter, PriceBook
//! ```
//! Meters (`Control::Meters`) and price books (rating's `broadcast`) are the types that skip fields
//! and cross processes; they change rarely, so their JSON costs nothing that shows. The test below
//! round-trips every kind of record the dataflow exchanges through bincode.

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that crosses processes as its JSON text (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Json<T>(pub T);

impl<T: Serialize> Serialize for Json<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        json_text::serialize(&self.0, serializer)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Json<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        json_text::deserialize(deserializer).map(Json)
    }
}

/// `#[serde(with = "crate::wire::json_text")]`: a field as its JSON text.
pub mod json_text {
    use super::*;

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(S::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use meterflow_model::{
        AggregateKey, Aggregation, Charge, Dimensions, Meter, PriceBook, PriceModel, Window,
    };
    use rust_decimal::Decimal;

    use super::*;
    use crate::control::Control;
    use crate::usage::Usage;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
        let bytes = bincode::serialize(&value).unwrap();
        let back: T = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, value);
    }

    fn count_meter() -> Meter {
        serde_json::from_str(
            r#"{"meter":"calls","event_type":"api_call","aggregation":"count","window":"hour"}"#,
        )
        .unwrap()
    }

    fn default_book() -> PriceBook {
        PriceBook {
            price_book_id: "b".into(),
            meter: "calls".into(),
            customer_id: None,
            dimensions: Dimensions::default(),
            currency: "USD".into(),
            effective_from: 0,
            effective_to: None,
            model: PriceModel::PerUnit {
                unit_price: Decimal::new(15, 1),
            },
            minimum_per_period: None,
            entries: Vec::new(),
        }
    }

    /// The records the dataflow exchanges, each with the fields its API form skips left empty.
    #[test]
    fn what_crosses_processes_reads_back_as_it_was_written() {
        assert_eq!(count_meter().aggregation, Aggregation::Count);
        assert_eq!(count_meter().window, Window::Hour);
        round_trip(Control::Meters {
            version: 3,
            meters: vec![count_meter()],
        });
        round_trip(Control::Watermark(7));
        round_trip((Json(default_book()), 2u64, 1isize));
        let key = AggregateKey {
            customer_id: "c".into(),
            meter: "calls".into(),
            window_start: 3_600,
            window_end: 7_200,
            dimensions: Dimensions::default(),
        };
        round_trip((
            (key, None::<meterflow_model::Item>),
            1u64,
            Usage::overflowed(2),
        ));
        round_trip((
            (
                "c".to_owned(),
                "calls".to_owned(),
                Charge {
                    dimensions: Dimensions::default(),
                    window_start: 3_600,
                    window_end: 7_200,
                    quantity: Decimal::new(150, 2),
                    amount: Decimal::ONE,
                    currency: "USD".into(),
                    price_book_id: "b".into(),
                },
            ),
            1u64,
            -1isize,
        ));
    }

    /// Without its JSON text, a meter or a book does not read back (this is what broke a cluster).
    #[test]
    fn a_struct_that_skips_a_field_does_not_read_back_through_bincode() {
        let bytes = bincode::serialize(&count_meter()).unwrap();
        assert!(bincode::deserialize::<Meter>(&bytes).is_err());
        let bytes = bincode::serialize(&default_book()).unwrap();
        assert_ne!(
            bincode::deserialize::<PriceBook>(&bytes).ok(),
            Some(default_book())
        );
    }
}
