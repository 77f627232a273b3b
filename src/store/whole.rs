//! Refuses XML replies cut short. A server or proxy that sends half of a reply with a
//! `Content-Length` that matches the half gives the SDK a well-formed HTTP answer, and its XML
//! reader takes a document that stops in the middle as ending there: a listing page cut after
//! its 50th key reads as a whole page of 50 keys when the fields that would tell (`KeyCount`,
//! `NextContinuationToken`) come after the keys, as they do in s3s's replies. An XML document
//! is whole only when it ends with its root element's end tag (XML 1.0 §2.1,
//! <https://www.w3.org/TR/xml/#sec-well-formed>), so the body of every successful reply to an
//! operation that answers with XML is checked for that as it is read; a cut one fails reading
//! like a broken connection, which the SDK retries.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Operations keepfs sends whose successful reply is an XML document (the S3 API reference's
/// response syntax for each). GetObject is not among them: its body is the object.
const XML_REPLIES: [&str; 10] = [
    "ListObjectsV2",
    "ListObjectVersions",
    "ListParts",
    "ListMultipartUploads",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "CopyObject",
    "UploadPartCopy",
    "DeleteObjects",
    "GetBucketVersioning",
];

/// The interceptor; [`super::S3Store`] adds it to every client it builds.
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeReplies;

impl Intercept for WholeReplies {
    fn name(&self) -> &'static str {
        "keepfs-whole-replies"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let xml = cfg
            .load::<Metadata>()
            .is_some_and(|m| XML_REPLIES.contains(&m.name()));
        let response = context.response_mut();
        if xml && response.status().is_success() {
            let body = std::mem::replace(response.body_mut(), SdkBody::taken());
            *response.body_mut() = SdkBody::from_body_1_x(Checked::new(body));
        }
        Ok(())
    }
}

/// A cut reply, as [`Checked`] reports it when the body ends.
#[derive(Debug, thiserror::Error)]
#[error("reply cut short: the XML document ends before its root element's end tag")]
pub struct CutReply;

/// How much of a body's beginning is kept to find the root element's name: the XML
/// declaration and a root start tag with its namespace fit many times over.
const HEAD: usize = 1024;
/// How much of a body's end is kept (space after the end excluded): the end tag of any S3
/// root element.
const TAIL: usize = 256;
/// The UTF-8 byte order mark a document may begin with (XML 1.0 §4.3.3).
const BOM: &[u8] = b"\xef\xbb\xbf";

/// A reply body that fails at its end unless it was a whole XML document.
struct Checked {
    inner: SdkBody,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Checked {
    fn new(inner: SdkBody) -> Self {
        Self {
            inner,
            head: Vec::new(),
            tail: Vec::new(),
        }
    }

    fn see(&mut self, data: &[u8]) {
        // Space before the document (servers send spaces to keep a long CompleteMultipartUpload
        // or CopyObject alive) and a byte order mark don't count towards the head.
        let mut data = data;
        if self.head.is_empty() {
            data = data.trim_ascii_start();
            data = data.strip_prefix(BOM).unwrap_or(data).trim_ascii_start();
        }
        let room = HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        // Space after the end tag doesn't count towards the tail: it never decides.
        let content = data.trim_ascii_end();
        if !content.is_empty() {
            self.tail.extend_from_slice(content);
            if self.tail.len() > TAIL {
                self.tail.drain(..self.tail.len() - TAIL);
            }
        }
    }
}

/// Whether a document that begins with `head` and ends with `tail` is whole: it ends with
/// `</root>` for the name of its first element, or that element's start tag is an
/// empty-element tag (`<root/>`) and ends it.
pub(crate) fn is_whole(head: &[u8], tail: &[u8]) -> bool {
    let Some((root, start_tag)) = root_element(head) else {
        return false;
    };
    let end = tail.trim_ascii_end();
    let Some(before_gt) = end.strip_suffix(b">") else {
        return false;
    };
    // An end tag may have space before its `>` (XML 1.0 §3.1, ETag ::= '</' Name S? '>').
    let mut opening = b"</".to_vec();
    opening.extend_from_slice(root);
    let empty_root = find(start_tag, b">").is_some_and(|gt| gt > 0 && start_tag[gt - 1] == b'/');
    before_gt.trim_ascii_end().ends_with(&opening) || (empty_root && before_gt.ends_with(b"/"))
}

/// The name of the first element in `head`, past the XML declaration, processing
/// instructions, comments and white space, and the rest of `head` after the name.
fn root_element(head: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut rest = head.trim_ascii_start();
    rest = rest.strip_prefix(BOM).unwrap_or(rest).trim_ascii_start();
    loop {
        if let Some(after) = rest.strip_prefix(b"<?") {
            rest = after[find(after, b"?>")? + 2..].trim_ascii_start();
        } else if let Some(after) = rest.strip_prefix(b"<!--") {
            rest = after[find(after, b"-->")? + 3..].trim_ascii_start();
        } else {
            break;
        }
    }
    let name = rest.strip_prefix(b"<")?;
    let len = name
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/')?;
    (len > 0).then(|| name.split_at(len))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Body for Checked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    self.see(&data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None if is_whole(&self.head, &self.tail) => Poll::Ready(None),
            None => Poll::Ready(Some(Err(CutReply.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is where the check happens: never skip it.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
        <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
        <IsTruncated>false</IsTruncated><Contents><Key>a</Key></Contents>\
        <KeyCount>1</KeyCount></ListBucketResult>\n";

    fn whole(doc: &str) -> bool {
        is_whole(doc.as_bytes(), doc.as_bytes())
    }

    #[test]
    fn a_whole_document_is_whole() {
        assert!(whole(PAGE));
        assert!(whole("<Error><Code>x</Code></Error>"));
        assert!(whole("  \n<!-- c --><?pi x?><Root/>  "));
        assert!(whole("<Root a=\"1\" />"));
        assert!(whole("\u{feff}<?xml version=\"1.0\"?><Root>x</Root >\n"));
    }

    #[test]
    fn padding_before_and_after_the_document_is_no_cut() {
        // Keep-alive spaces before a long CompleteMultipartUpload's reply, and padding after.
        let doc = format!(
            "{}<?xml version=\"1.0\"?>\n<CompleteMultipartUploadResult><ETag>\"x\"</ETag></CompleteMultipartUploadResult>{}",
            " ".repeat(5000),
            " \n".repeat(400)
        );
        for size in [1, 3, 100, 4096, 20_000] {
            let mut checked = Checked::new(SdkBody::empty());
            for chunk in doc.as_bytes().chunks(size) {
                checked.see(chunk);
            }
            assert!(is_whole(&checked.head, &checked.tail), "chunks of {size}");
        }
        assert!(!whole("<Root><A>x</A>   \n  "));
        assert!(!whole("<Root/   "));
    }

    #[test]
    fn every_cut_of_a_document_is_refused() {
        // Every proper prefix, the end tag's own cuts included; trailing space is no content.
        let end = PAGE.trim_end().len();
        for cut in 0..end {
            assert!(!whole(&PAGE[..cut]), "cut at {cut}: {:?}", &PAGE[..cut]);
        }
    }

    #[test]
    fn a_document_ending_in_an_inner_element_is_cut() {
        assert!(!whole("<Root><Contents><Key>a</Key></Contents>"));
        assert!(!whole("<Root><Empty/>"));
        assert!(!whole("<Root><Key>a</Key></Contents>"));
    }

    #[test]
    fn the_check_sees_a_body_in_any_chunks() {
        for size in [1, 2, 7, 64, 300, 5000] {
            let mut checked = Checked::new(SdkBody::empty());
            let mut doc = PAGE.replace("<Key>a</Key>", &"<Key>k</Key>".repeat(200));
            doc.push_str("\n\n");
            for chunk in doc.as_bytes().chunks(size) {
                checked.see(chunk);
            }
            assert!(is_whole(&checked.head, &checked.tail), "chunks of {size}");
            let mut cut = Checked::new(SdkBody::empty());
            for chunk in doc.as_bytes()[..doc.len() / 2].chunks(size) {
                cut.see(chunk);
            }
            assert!(!is_whole(&cut.head, &cut.tail), "half in chunks of {size}");
        }
    }
}
