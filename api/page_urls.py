from django.urls import path

from api import pages

app_name = "apitokens"
urlpatterns = [
    path("", pages.token_list, name="list"),
    path("<int:pk>/revoke/", pages.token_revoke, name="revoke"),
]
