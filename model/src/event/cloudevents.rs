//! CloudEvents 1.0 in structured JSON mode (SPEC §2): `id`→event_id, `subject`→customer_id,
//! `type`→event_type, `time`→event_time, `data.value`→value, the rest of `data`→properties; then the
//! same validation as a plain event, with the errors named by the CloudEvents fields.

use super::*;

/// A CloudEvents 1.0 event in structured JSON mode (SPEC §2): `id`→event_id, `subject`→customer_id,
/// `type`→event_type, `time`→event_time, `data.value`→value, the rest of `data`→properties.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloudEvent<'a> {
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    #[allow(dead_code)] // required by CloudEvents; meterflow does not use it
    source: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    #[allow(dead_code)]
    dataschema: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// Decodes and validates one CloudEvents 1.0 JSON event (`application/cloudevents+json`).
pub fn decode_cloudevent(
    bytes: &[u8],
    reference_micros: i64,
    limits: &Limits,
) -> Result<Event, DecodeError> {
    let raw: RawCloudEvent = serde_json::from_slice(object(bytes)?).map_err(malformed)?;
    let mut errors = Vec::new();
    if raw.specversion != "1.0" {
        errors.push(field("specversion", "must be \"1.0\""));
    }
    if let Some(ct) = &raw.datacontenttype {
        if !ct.starts_with("application/json") {
            errors.push(field("datacontenttype", "must be application/json"));
        }
    }
    let (mut value, mut rest) = (None, Vec::new());
    if let Some(data) = raw.data {
        let Entries(entries) = serde_json::from_str(data.get())
            .map_err(|_| DecodeError::Malformed("data must be a JSON object".into()))?;
        for (key, v) in entries {
            if key.0 == "value" {
                if value.replace(v).is_some() {
                    return Err(DecodeError::Malformed(
                        "duplicate key in data: value".into(),
                    ));
                }
            } else {
                rest.push((key, v));
            }
        }
    }
    // A missing subject or time is reported by the validator as an empty one.
    let parts = Parts {
        event_id: raw.id,
        customer_id: raw.subject.unwrap_or_default(),
        event_type: raw.kind,
        event_time: raw.time.unwrap_or_default(),
        value,
        properties: Some(Properties::Entries(rest)),
    };
    match validate(parts, reference_micros, limits) {
        Err(DecodeError::Invalid(mut more)) => {
            errors.append(&mut more);
            Err(DecodeError::Invalid(rename_cloudevent_fields(errors)))
        }
        Ok(_) if !errors.is_empty() => Err(DecodeError::Invalid(errors)),
        other => other,
    }
}

/// Field paths in a CloudEvent's own names, so a client can find what to fix.
pub(super) fn rename_cloudevent_fields(errors: Vec<FieldError>) -> Vec<FieldError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.field = match e.field.as_str() {
                "event_id" => "id".into(),
                "customer_id" => "subject".into(),
                "event_type" => "type".into(),
                "event_time" => "time".into(),
                "value" => "data.value".into(),
                other => match other.strip_prefix("properties") {
                    Some(rest) => format!("data{rest}"),
                    None => other.into(),
                },
            };
            e
        })
        .collect()
}
