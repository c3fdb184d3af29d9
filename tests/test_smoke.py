from credits.v1 import credits_pb2 as pb


async def test_server_answers_check_for_unknown_account_with_zero(
    start_server, database_url, accounts
):
    server = await start_server(database_url)
    response = await server.stub.CheckCredits(
        pb.CheckCreditsRequest(account_id=accounts("x"), amount=1)
    )
    assert not response.allowed
    assert response.shortfall == 1
