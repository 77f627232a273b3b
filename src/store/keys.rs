//! Object keys inside request headers and listing replies, where the SDK passes text through
//! as it is: keys must be URL-encoded on the way out and decoded on the way back.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What `x-amz-copy-source` leaves as it is: RFC 3986's unreserved characters and `/`
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_CopyObject.html>: "The value must be
/// URL-encoded").
const COPY_SOURCE_KEEPS: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// `key` URL-encoded for `x-amz-copy-source`: every byte but unreserved characters and `/`
/// as `%XX`.
pub(super) fn encode_for_copy_source(key: &str) -> String {
    utf8_percent_encode(key, COPY_SOURCE_KEEPS).to_string()
}

/// A key, prefix or key marker from a listing reply, decoded when the reply says its keys are
/// URL-encoded (`EncodingType` `url`, which keepfs asks for: XML 1.0 can't carry keys with
/// control characters, so without it one such key makes the whole page unreadable).
///
/// `+` stands for a space: AWS encodes keys the way HTML forms do (a literal `+` comes as
/// `%2B`), and so do the SDKs that decode (botocore's `unquote_plus`). Returns `None` when the
/// decoded bytes are not UTF-8, which no S3 key can be.
fn decode_listed(text: &str, encoded: bool) -> Option<Cow<'_, str>> {
    if !encoded {
        return Some(Cow::Borrowed(text));
    }
    let spaced: Cow<'_, str> = if text.contains('+') {
        Cow::Owned(text.replace('+', " "))
    } else {
        Cow::Borrowed(text)
    };
    let decoded = percent_decode_str(&spaced).decode_utf8().ok()?;
    Some(Cow::Owned(decoded.into_owned()))
}

/// [`decode_listed`] as an owned key; a key that can't be decoded is logged and left out (the
/// rest of the page is still listed).
pub(super) fn listed_key(text: &str, encoded: bool) -> Option<String> {
    let key = decode_listed(text, encoded).map(Cow::into_owned);
    if key.is_none() {
        tracing::warn!(
            encoded_key = text,
            "skipping a listed key that is not UTF-8 once URL-decoded"
        );
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_encodes_all_but_unreserved_and_slash() {
        assert_eq!(
            encode_for_copy_source("a b/ü+%.txt\u{1}~"),
            "a%20b/%C3%BC%2B%25.txt%01~"
        );
    }

    #[test]
    fn listed_keys_decode_as_aws_encodes_them() {
        let decode = |s| decode_listed(s, true).map(Cow::into_owned);
        assert_eq!(decode("d/a%01b").as_deref(), Some("d/a\u{1}b"));
        assert_eq!(decode("d/a+b%2Bc").as_deref(), Some("d/a b+c"));
        assert_eq!(decode("d/a%20b").as_deref(), Some("d/a b"));
        assert_eq!(decode("d/x%2541").as_deref(), Some("d/x%41"));
        assert_eq!(decode("d/%C3%A9/").as_deref(), Some("d/é/"));
        // Not UTF-8 once decoded: no S3 key can be that.
        assert_eq!(decode("d/%FF"), None);
        // A server that ignored the request: nothing to decode.
        assert_eq!(
            decode_listed("d/a+b%41", false).as_deref(),
            Some("d/a+b%41")
        );
    }

    #[test]
    fn encoding_then_decoding_gives_the_key_back() {
        for key in ["plain", "a b+c", "x%41", "ctl\u{1}\u{7f}", "ü/é/", "//.."] {
            let encoded = encode_for_copy_source(key);
            assert_eq!(decode_listed(&encoded, true).as_deref(), Some(key));
        }
    }
}
