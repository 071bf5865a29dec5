//! Text for the PDF's standard Type1 fonts (Helvetica, Helvetica-Bold) in WinAnsiEncoding: encoding a
//! `&str` (characters outside the encoding are folded to a close ASCII form or replaced by `?`) and
//! measuring encoded text with the fonts' metrics, so text can be right-aligned and wrapped.

/// The two faces the PDF uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Face {
    Regular,
    Bold,
}

/// Encodes `text` in WinAnsiEncoding (Windows-1252): ASCII and Latin-1 as they are, the typographic
/// characters of 0x80–0x9F (€, –, —, ‘’, “”, •, …) at their codes; control characters and line
/// breaks become spaces; other characters are folded (`−` → `-`, `ł` → `l`, `≤` → `<=`) or become `?`.
pub(crate) fn encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let code = c as u32;
        match code {
            0x20..=0x7e | 0xa0..=0xff => out.push(code as u8),
            0x00..=0x1f | 0x7f..=0x9f => out.push(b' '),
            _ => match c {
                '€' => out.push(0x80),
                '‚' => out.push(0x82),
                'ƒ' => out.push(0x83),
                '„' => out.push(0x84),
                '…' => out.push(0x85),
                '†' => out.push(0x86),
                '‡' => out.push(0x87),
                'ˆ' => out.push(0x88),
                '‰' => out.push(0x89),
                'Š' => out.push(0x8a),
                '‹' => out.push(0x8b),
                'Œ' => out.push(0x8c),
                'Ž' => out.push(0x8e),
                '‘' => out.push(0x91),
                '’' => out.push(0x92),
                '“' => out.push(0x93),
                '”' => out.push(0x94),
                '•' => out.push(0x95),
                '–' => out.push(0x96),
                '—' => out.push(0x97),
                '˜' => out.push(0x98),
                '™' => out.push(0x99),
                'š' => out.push(0x9a),
                '›' => out.push(0x9b),
                'œ' => out.push(0x9c),
                'ž' => out.push(0x9e),
                'Ÿ' => out.push(0x9f),
                '\u{2212}' | '\u{2010}' | '\u{2011}' | '\u{2043}' => out.push(b'-'),
                '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' => out.push(b' '),
                '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}' => {}
                '≤' => out.extend_from_slice(b"<="),
                '≥' => out.extend_from_slice(b">="),
                '→' => out.extend_from_slice(b"->"),
                '←' => out.extend_from_slice(b"<-"),
                c => out.push(fold(c).unwrap_or(b'?')),
            },
        }
    }
    out
}

/// The base letter of the common Latin Extended-A letters (Central European, Turkish, Romanian,
/// Baltic), so `Łódź` prints as `Lódz` rather than `?ód?`.
fn fold(c: char) -> Option<u8> {
    Some(match c {
        'Ā' | 'Ă' | 'Ą' => b'A',
        'ā' | 'ă' | 'ą' => b'a',
        'Ć' | 'Ĉ' | 'Ċ' | 'Č' => b'C',
        'ć' | 'ĉ' | 'ċ' | 'č' => b'c',
        'Ď' | 'Đ' => b'D',
        'ď' | 'đ' => b'd',
        'Ē' | 'Ĕ' | 'Ė' | 'Ę' | 'Ě' => b'E',
        'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => b'e',
        'Ĝ' | 'Ğ' | 'Ġ' | 'Ģ' => b'G',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => b'g',
        'Ĥ' | 'Ħ' => b'H',
        'ĥ' | 'ħ' => b'h',
        'Ĩ' | 'Ī' | 'Ĭ' | 'Į' | 'İ' => b'I',
        'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => b'i',
        'Ĵ' => b'J',
        'ĵ' => b'j',
        'Ķ' => b'K',
        'ķ' => b'k',
        'Ĺ' | 'Ļ' | 'Ľ' | 'Ŀ' | 'Ł' => b'L',
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => b'l',
        'Ń' | 'Ņ' | 'Ň' => b'N',
        'ń' | 'ņ' | 'ň' => b'n',
        'Ō' | 'Ŏ' | 'Ő' => b'O',
        'ō' | 'ŏ' | 'ő' => b'o',
        'Ŕ' | 'Ŗ' | 'Ř' => b'R',
        'ŕ' | 'ŗ' | 'ř' => b'r',
        'Ś' | 'Ŝ' | 'Ş' | 'Ș' => b'S',
        'ś' | 'ŝ' | 'ş' | 'ș' => b's',
        'Ţ' | 'Ť' | 'Ŧ' | 'Ț' => b'T',
        'ţ' | 'ť' | 'ŧ' | 'ț' => b't',
        'Ũ' | 'Ū' | 'Ŭ' | 'Ů' | 'Ű' | 'Ų' => b'U',
        'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => b'u',
        'Ŵ' => b'W',
        'ŵ' => b'w',
        'Ŷ' => b'Y',
        'ŷ' => b'y',
        'Ź' | 'Ż' => b'Z',
        'ź' | 'ż' => b'z',
        _ => return None,
    })
}

/// The width of WinAnsi-encoded `text` set in `face` at `size` points (no kerning: PDF viewers do not
/// kern a plain `Tj`).
pub(crate) fn width(face: Face, size: f32, text: &[u8]) -> f32 {
    let widths = match face {
        Face::Regular => &HELVETICA,
        Face::Bold => &HELVETICA_BOLD,
    };
    let units: u32 = text
        .iter()
        .map(|&b| u32::from(widths[usize::from(b.saturating_sub(32))]))
        .sum();
    units as f32 * size / 1000.0
}

/// Breaks encoded `text` into lines no wider than `max`: at spaces where it can, inside a word only
/// when the word alone is wider than a line (ids, long meter names). Always at least one line.
pub(crate) fn wrap(face: Face, size: f32, text: &[u8], max: f32) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for word in text.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let candidate = if line.is_empty() {
            width(face, size, word)
        } else {
            width(face, size, &line) + width(face, size, b" ") + width(face, size, word)
        };
        if candidate <= max {
            if !line.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(word);
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        // The word alone is wider than a line: split it where it reaches the edge, after the last
        // `-`, `_`, `/`, `.` or `@` of that line if there is one.
        for &b in word {
            if !line.is_empty() && width(face, size, &line) + width(face, size, &[b]) > max {
                let cut = line
                    .iter()
                    .rposition(|c| matches!(c, b'-' | b'_' | b'/' | b'.' | b'@'))
                    .map_or(line.len(), |i| i + 1);
                let rest = line.split_off(cut);
                lines.push(std::mem::replace(&mut line, rest));
                if width(face, size, &line) + width(face, size, &[b]) > max {
                    lines.push(std::mem::take(&mut line));
                }
            }
            line.push(b);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

// Advance widths (1/1000 em) of WinAnsiEncoding codes 32..=255, from Adobe's AFM metrics of the
// standard Type1 fonts (the same numbers every PDF viewer uses for them); 0 for unused codes.
const HELVETICA: [u16; 224] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556,
    556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, 1015, 667, 667, 722, 722, 667,
    611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667,
    667, 611, 278, 278, 278, 469, 556, 333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500,
    222, 833, 556, 556, 556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,
    0, 556, 0, 222, 556, 333, 1000, 556, 556, 333, 1000, 667, 333, 1000, 0, 611, 0, 0, 222, 222,
    333, 333, 350, 556, 1000, 333, 1000, 500, 333, 944, 0, 500, 667, 278, 333, 556, 556, 556, 556,
    260, 556, 333, 737, 370, 556, 584, 333, 737, 333, 400, 584, 333, 333, 333, 578, 537, 278, 333,
    333, 365, 556, 834, 834, 834, 611, 667, 667, 667, 667, 667, 667, 1000, 722, 667, 667, 667, 667,
    278, 278, 278, 278, 722, 722, 778, 778, 778, 778, 778, 584, 778, 722, 722, 722, 722, 667, 667,
    611, 556, 556, 556, 556, 556, 556, 889, 500, 556, 556, 556, 556, 278, 278, 278, 278, 556, 556,
    556, 556, 556, 556, 556, 584, 611, 556, 556, 556, 556, 500, 556, 500,
];
const HELVETICA_BOLD: [u16; 224] = [
    278, 333, 474, 556, 556, 889, 722, 238, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556,
    556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611, 975, 722, 722, 722, 722, 667,
    611, 778, 722, 278, 556, 722, 611, 833, 722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667,
    667, 611, 333, 278, 333, 584, 556, 333, 556, 611, 556, 611, 556, 333, 611, 611, 278, 278, 556,
    278, 889, 611, 611, 611, 611, 389, 556, 333, 611, 556, 778, 556, 556, 500, 389, 280, 389, 584,
    0, 556, 0, 278, 556, 500, 1000, 556, 556, 333, 1000, 667, 333, 1000, 0, 611, 0, 0, 278, 278,
    500, 500, 350, 556, 1000, 333, 1000, 556, 333, 944, 0, 500, 667, 278, 333, 556, 556, 556, 556,
    280, 556, 333, 737, 370, 556, 584, 333, 737, 333, 400, 584, 333, 333, 333, 611, 556, 278, 333,
    333, 365, 556, 834, 834, 834, 611, 722, 722, 722, 722, 722, 722, 1000, 722, 667, 667, 667, 667,
    278, 278, 278, 278, 722, 722, 778, 778, 778, 778, 778, 584, 778, 722, 722, 722, 722, 667, 667,
    611, 556, 556, 556, 556, 556, 556, 889, 556, 556, 556, 556, 556, 278, 278, 278, 278, 611, 611,
    611, 611, 611, 611, 611, 584, 611, 611, 611, 611, 611, 556, 611, 556,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_1_and_typographic_characters_keep_their_winansi_codes() {
        assert_eq!(encode("Zoë – 5 €"), b"Zo\xeb \x96 5 \x80".to_vec());
        assert_eq!(encode("“quoted”"), b"\x93quoted\x94".to_vec());
    }

    #[test]
    fn characters_outside_winansi_are_folded_or_replaced() {
        assert_eq!(encode("\u{2212}12.00"), b"-12.00".to_vec());
        assert_eq!(encode("Łódź"), b"L\xf3dz".to_vec());
        assert_eq!(encode("東京"), b"??".to_vec());
        assert_eq!(encode("a\nb\tc"), b"a b c".to_vec());
    }

    #[test]
    fn widths_follow_the_helvetica_metrics() {
        // "A" is 667 units in Helvetica, 722 in Helvetica-Bold; digits are 556 in both.
        assert_eq!(width(Face::Regular, 10.0, b"A"), 6.67);
        assert_eq!(width(Face::Bold, 10.0, b"A"), 7.22);
        assert_eq!(width(Face::Regular, 1000.0, b"0123456789"), 5560.0);
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_splits_only_overlong_words() {
        let lines = wrap(Face::Regular, 10.0, b"one two three four", 50.0);
        assert_eq!(lines, vec![b"one two".to_vec(), b"three four".to_vec()]);
        let long = wrap(Face::Regular, 10.0, b"abcdefghijklmnopqrstuvwxyz", 40.0);
        assert!(long.len() > 1);
        assert!(long.iter().all(|l| width(Face::Regular, 10.0, l) <= 40.0));
        assert_eq!(long.concat(), b"abcdefghijklmnopqrstuvwxyz".to_vec());
        assert_eq!(wrap(Face::Regular, 10.0, b"", 40.0), vec![Vec::<u8>::new()]);
    }
}
