//! The dimension filters of the window lists (issue 17, `docs/dimensions.md`): `dimension.<key>=<value>`
//! (repeatable, every one must match) and `null_dimension=<key>` (the value is `null`). Their names
//! carry the key, so they cannot be fields of a query struct that refuses unknown fields: [`split`]
//! takes them out of the raw query and hands the rest to the struct.
//!
//! ```text
//!  ?meter=llm_tokens&dimension.model=large&null_dimension=region
//!     ├─► the list's query struct ← meter=llm_tokens
//!     └─► selector {"model": "large", "region": null} ─► SQL `dimensions @> $selector::jsonb`
//! ```
//! A window of a meter without `group_by` has `{}`, which contains no selector but the empty one.

use meterflow_model::dimensions::{is_key, value_problem};
use meterflow_model::Dimensions;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The prefix of a filter on one dimension's value.
const VALUE_FILTER: &str = "dimension.";

/// The filter on a dimension whose value is `null`.
const NULL_FILTER: &str = "null_dimension";

/// The list's own query (every other parameter) and the dimension values asked for (`None` without a
/// dimension filter).
pub fn split<T: DeserializeOwned>(raw: Option<&str>) -> Result<(T, Option<Dimensions>), ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|e| ApiError::BadRequest(format!("the query string is not form-encoded: {e}")))?;
    let mut rest = Vec::with_capacity(pairs.len());
    let mut wanted: Vec<(String, Option<String>)> = Vec::new();
    for (name, value) in pairs {
        let (key, value) = if let Some(key) = name.strip_prefix(VALUE_FILTER) {
            (key.to_owned(), Some(value))
        } else if name == NULL_FILTER {
            (value, None)
        } else {
            rest.push((name, value));
            continue;
        };
        check_key(&key)?;
        if let Some(problem) = value.as_deref().and_then(value_problem) {
            return Err(ApiError::BadRequest(format!(
                "dimension.{key}: a dimension value {problem}"
            )));
        }
        if wanted.iter().any(|(k, _)| *k == key) {
            return Err(ApiError::BadRequest(format!(
                "dimension {key} is filtered twice; a window has one value per dimension"
            )));
        }
        wanted.push((key, value));
    }
    let rest = serde_urlencoded::to_string(&rest)
        .map_err(|e| ApiError::BadRequest(format!("the query string is not form-encoded: {e}")))?;
    let query: T = serde_urlencoded::from_str(&rest).map_err(|e| {
        ApiError::BadRequest(format!(
            "Failed to deserialize query string: {e} (dimension filters are `dimension.<key>=<value>` and \
             `null_dimension=<key>`)"
        ))
    })?;
    let selector = (!wanted.is_empty()).then(|| Dimensions::from_pairs(wanted));
    Ok((query, selector))
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if is_key(key) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{:?} is not a dimension key: keys are 1 to 32 characters of [a-z0-9_]",
            meterflow_model::printable(key)
        )))
    }
}

/// The dimension part of a window list's cursor as the canonical JSON text the list's SQL compares: a
/// cursor made by another list (no dimensions) is `{}`; one that is not dimension values is a 400.
pub fn cursor_dimensions(text: &str) -> Result<String, ApiError> {
    if text.is_empty() {
        return Ok("{}".to_owned());
    }
    let bad = || ApiError::BadRequest("cursor is not one this API returned".into());
    let dimensions = text.parse::<Dimensions>().map_err(|_| bad())?;
    // Postgres' jsonb holds no NUL, and no value the API returned does.
    if dimensions
        .iter()
        .any(|(_, v)| v.is_some_and(|v| v.contains('\0')))
    {
        return Err(bad());
    }
    Ok(dimensions.to_string())
}

/// What the OpenAPI document says of the filters, in each list's description.
pub const DOC: &str = "Filter by dimension values with `dimension.<key>=<value>` (repeatable; every \
     one must match) and `null_dimension=<key>` (the key's value is null). A window of a meter without \
     `group_by` matches no dimension filter.";

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Q {
        meter: Option<String>,
    }

    #[test]
    fn filters_are_taken_out_and_the_rest_is_the_query() {
        let (q, sel): (Q, _) = split(Some(
            "meter=m&dimension.model=la%20rge&null_dimension=region",
        ))
        .unwrap();
        assert_eq!(q.meter.as_deref(), Some("m"));
        assert_eq!(
            sel.unwrap().to_string(),
            r#"{"model":"la rge","region":null}"#
        );
        let (_, sel): (Q, _) = split(None).unwrap();
        assert!(sel.is_none());
    }

    #[test]
    fn bad_filters_are_400_not_a_panic() {
        for bad in [
            "dimension.Model=x",
            "dimension.=x",
            "null_dimension=a-b",
            "dimension.a=x&null_dimension=a",
            "dimension.a=x%00y",
            "unknown=1",
            &format!("dimension.a={}", "x".repeat(257)),
        ] {
            assert!(split::<Q>(Some(bad)).is_err(), "{bad}");
        }
    }
}
