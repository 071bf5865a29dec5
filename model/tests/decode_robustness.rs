//! The decoder on hostile input, on stable Rust (the `cargo fuzz` target in `fuzz/` goes further): valid
//! events and CloudEvents mutated at random — bytes flipped, cut, duplicated, spliced — never panic, and
//! whatever is accepted re-encodes to JSON that decodes to the same event.

use meterflow_model::{decode_as, split_batch, Format, Limits};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NOW: i64 = 1_705_329_000_000_000;

const SEEDS: &[&str] = &[
    r#"{"event_id":"evt_01","customer_id":"cust_123","event_type":"api_call","event_time":"2024-01-15T14:30:00Z","value":"1.5","properties":{"region":"eu","n":3,"ok":true}}"#,
    r#"{"event_id":"e","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00+02:00","value":0.30000000000000004}"#,
    r#"{"specversion":"1.0","id":"x1","source":"/s","type":"api_call","subject":"c9","time":"2024-01-15T14:30:00Z","data":{"value":2,"k":"v\u0041"}}"#,
    r#"[{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z"},{"event_id":"b"}]"#,
];

fn mutate(rng: &mut SmallRng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..6) {
        if out.is_empty() {
            break;
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..6) {
            0 => out[at] = rng.random(),
            1 => out.truncate(at),
            2 => {
                let end = (at + rng.random_range(1..20)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            3 => {
                out.remove(at);
            }
            4 => {
                let set = b"{}[]\",:\\0e-9";
                out.insert(at, set[rng.random_range(0..set.len())])
            }
            _ => {
                let other = SEEDS[rng.random_range(0..SEEDS.len())].as_bytes();
                let from = rng.random_range(0..other.len());
                out.splice(at..at, other[from..].iter().copied().take(30));
            }
        }
    }
    out
}

#[test]
fn mutated_events_never_panic_and_accepted_ones_round_trip() {
    let limits = Limits::default();
    let mut rng = SmallRng::seed_from_u64(2024);
    let mut accepted = 0;
    for i in 0..200_000 {
        let seed = SEEDS[i % SEEDS.len()].as_bytes();
        let input = mutate(&mut rng, seed);
        for format in [Format::Plain, Format::CloudEvent] {
            if let Ok(event) = decode_as(format, &input, NOW, &limits) {
                accepted += 1;
                let again = decode_as(Format::Plain, &event.to_json(), NOW, &limits)
                    .unwrap_or_else(|e| {
                        panic!(
                            "{:?} re-encoded badly: {e}",
                            String::from_utf8_lossy(&input)
                        )
                    });
                assert_eq!(again, event);
            }
        }
        if let Ok(items) = split_batch(&input) {
            for item in items {
                let _ = decode_as(Format::Plain, item.get().as_bytes(), NOW, &limits);
            }
        }
    }
    assert!(
        accepted > 1_000,
        "the mutations keep some inputs valid ({accepted})"
    );
}

#[test]
fn pathological_nesting_and_sizes_are_refused_without_harm() {
    let limits = Limits::default();
    for depth in [1_000, 100_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(decode_as(Format::Plain, deep.as_bytes(), NOW, &limits).is_err());
        let inside = format!(
            r#"{{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":{{"a":{deep}}}}}"#
        );
        assert!(decode_as(Format::Plain, inside.as_bytes(), NOW, &limits).is_err());
    }
    let many_keys: String = (0..50_000).map(|i| format!(r#""k{i}":1,"#)).collect();
    let wide = format!(
        r#"{{"event_id":"a","customer_id":"c","event_type":"t","event_time":"2024-01-15T14:30:00Z","properties":{{{}"z":1}}}}"#,
        many_keys
    );
    assert!(
        decode_as(Format::Plain, wide.as_bytes(), NOW, &limits).is_err(),
        "over 4 KiB of properties"
    );
}
