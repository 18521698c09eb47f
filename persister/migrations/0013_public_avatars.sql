-- v1.1 media: anyone may read any profile, so anyone may see the picture a
-- profile names (`media_access` allows a media that is someone's current
-- avatar). Looked up by media id, so the avatar column gets an index.
CREATE INDEX profiles_avatar ON profiles (avatar) WHERE avatar IS NOT NULL;
