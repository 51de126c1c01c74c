-- Raises (SQLSTATE WP409) unless `ok`: a statement that must write all or nothing calls it last,
-- so a failed condition rolls the whole autocommit statement back (see `append_following`).
CREATE FUNCTION webpods_require(ok BOOLEAN) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'the stream head moved' USING ERRCODE = 'WP409';
    END IF;
    RETURN TRUE;
END
$$;
