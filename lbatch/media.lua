-- Deprecated forwarder: `lbatch.media` is internal since 1.0, now `lbatch.impl.formats.media`.
-- The name was announced in CHANGELOG.md, so it forwards until 2.0, where it is removed.
return require "lbatch.impl.formats.media"
