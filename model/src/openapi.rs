//! The OpenAPI schemas of the wire shapes no Rust type spells on its own, for the derived ones to name
//! with `#[schema(value_type = …)]`, and the patterns the request types share (feature `openapi`; the
//! API's document is the only user).
//!
//! A decimal is one `rust_decimal::Decimal` in Rust but two shapes on the wire: requests take a JSON
//! number or a string of digits ([`DecimalIn`]), responses give a JSON number with its exact digits
//! ([`Decimal`]). A type cannot say which of the two its field is, so the field does.

use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// A decimal spelled as a string.
const DIGITS: &str = "^-?[0-9]+(\\.[0-9]+)?$";

/// A string schema with a pattern, named for the fields that share it.
macro_rules! pattern {
    ($(#[$doc:meta])* $name:ident, $pattern:expr, $example:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some($pattern))
                    .examples([serde_json::json!($example)])
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

pattern!(
    /// An event id or customer id: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
    Id,
    "^[A-Za-z0-9._:-]{1,128}$",
    "cust_1"
);
pattern!(
    /// A meter name or event type: 1 to 64 of `a-z 0-9 _ . -`.
    Name,
    "^[a-z0-9_.-]{1,64}$",
    "api_calls"
);
pattern!(
    /// An ISO 4217 currency code.
    Currency,
    "^[A-Z]{3}$",
    "USD"
);
pattern!(
    /// A calendar month, `YYYY-MM`.
    Month,
    "^[0-9]{4}-(0[1-9]|1[0-2])$",
    "2024-01"
);

/// A decimal in a request: a JSON number or a string of digits.
pub struct DecimalIn;

impl PartialSchema for DecimalIn {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(DIGITS)),
            )
            .description(Some("A decimal: a JSON number or a string of digits"))
            .into()
    }
}

impl ToSchema for DecimalIn {}

/// A decimal in a response: a JSON number with its exact digits, never rounded through a float.
pub struct Decimal;

impl PartialSchema for Decimal {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .description(Some("A decimal with its exact digits"))
            .into()
    }
}

impl ToSchema for Decimal {}
